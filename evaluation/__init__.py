"""The evaluator: protocol metrics, distances, trials, re-ranking, test-time embeddings and plots."""
