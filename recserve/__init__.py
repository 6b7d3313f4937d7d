"""recserve: export, serve and benchmark BERT-family encoders for recommender systems."""

__version__ = "0.1.0"
