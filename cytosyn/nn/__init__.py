"""Shared neural-network plumbing: safe weight loading and the timm backbone factory."""
