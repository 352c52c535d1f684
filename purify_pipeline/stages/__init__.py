"""The Ray jobs: `fit_purifier` (Ray Train), `PurifyStage` (a Ray Data map stage) and `purify_shards` (shards in, shards out)."""
