from medcritical.components.prepare_data.component import IMAGE, prepare_data

__all__ = ["IMAGE", "prepare_data"]
