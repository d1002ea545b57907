from medcritical.components.report.component import IMAGE, report

__all__ = ["IMAGE", "report"]
