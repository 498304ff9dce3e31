"""recsys: Hydra-composed recommender experiments on TorchRec embeddings."""

__version__ = "0.1.0"
