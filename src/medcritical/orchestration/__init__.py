"""What runs the stages and reads across them: the one runner, the run's layout, the recipe, the round loop, the run report, the arms comparison."""
