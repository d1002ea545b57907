"""The MedCritical pipeline (installed as `medcritical.pipelines`) and its compiled YAML."""
