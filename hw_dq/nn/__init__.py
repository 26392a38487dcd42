"""Neural-network layers: Brevitas quantizers, the model zoo, Lipschitz diagnostics and regularisers."""
