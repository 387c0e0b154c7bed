"""`python -m ilrdpo`: the command line (also what `accelerate launch -m ilrdpo` runs)."""

from ilrdpo.cli import main

if __name__ == "__main__":
    main()
