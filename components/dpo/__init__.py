from medcritical.components.dpo.component import IMAGE, dpo

__all__ = ["IMAGE", "dpo"]
