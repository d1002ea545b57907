"""Stage 1 data: a teacher writes thought templates and long chains of thought, verified by the grader.

Entry point: `medcritical.distill.run.distill` (this package stays import-light: the recipe imports
its config).
"""
