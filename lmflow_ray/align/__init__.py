"""RAFT and iterative DPO: Ray Data generation and scoring stages around the train path."""
