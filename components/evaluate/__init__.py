from medcritical.components.evaluate.component import IMAGE, evaluate

__all__ = ["IMAGE", "evaluate"]
