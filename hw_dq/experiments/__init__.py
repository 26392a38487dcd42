"""Orchestrators that compose the stage functions: the demo and the reproduction."""
