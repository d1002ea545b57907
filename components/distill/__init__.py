from medcritical.components.distill.component import IMAGE, distill

__all__ = ["IMAGE", "distill"]
