from medcritical.components.sft.component import IMAGE, sft

__all__ = ["IMAGE", "sft"]
