"""BalPoE models (configuration, modeling and the code shipped with them), as transformers' models/<name>/."""
