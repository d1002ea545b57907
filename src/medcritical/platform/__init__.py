"""Where the stages run: KFP components' runtime, the pipeline's compile/submit and local run, TrainJobs, scheduling, the sizing preflight."""
