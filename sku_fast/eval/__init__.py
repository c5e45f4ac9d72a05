"""What unlearning bought and what it cost: judges, metrics, generation, evaluation of one
model, the comparison of several and its report."""
