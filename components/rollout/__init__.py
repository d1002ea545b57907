from medcritical.components.rollout.component import IMAGE, rollout

__all__ = ["IMAGE", "rollout"]
