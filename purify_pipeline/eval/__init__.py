"""Evaluation: baseline defenses, classifiers and their trainers (in-process and Ray Train), metrics, the learnability audit."""
