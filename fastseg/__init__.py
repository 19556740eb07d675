"""Shared plumbing for the Fast-SCNN curriculum trainers and the efficiency tool."""
