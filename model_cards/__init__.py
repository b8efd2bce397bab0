"""Model card templates, installed as ``bcos_hf.model_cards`` and rendered by ``bcos_hf.model_card``."""
