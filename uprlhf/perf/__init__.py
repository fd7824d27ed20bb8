"""Performance accounting: the machine's measured limits and each stage's bound against them."""
