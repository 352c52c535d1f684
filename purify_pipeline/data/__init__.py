"""Data: WebDataset shards (read, write, manifests), dataset converters, a webdataset streaming loader and augmentation."""
