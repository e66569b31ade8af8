"""Load and benchmark harness: it prints tables; tests never assert wall-clock times."""
