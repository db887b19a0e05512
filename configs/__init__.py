"""Training configurations: python files with get_config() -> ml_collections.ConfigDict."""
