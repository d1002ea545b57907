"""CMExam data: loading (data.cmexam), splits and leakage (data.splits), the bundled sample."""
