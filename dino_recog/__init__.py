"""dino_recog: DINO pretraining and re-identification fine-tuning in one toolkit."""

__version__ = "0.1.0"
