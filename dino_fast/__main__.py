"""`python -m dino_fast` runs the training script (same as `python -m dino_fast.train`)."""
from dino_fast.train import main

if __name__ == "__main__":
    main()
