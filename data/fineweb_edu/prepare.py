"""Prepare fineweb_edu into data/fineweb_edu: python data/fineweb_edu/prepare.py [--input FILE] [--out DIR]"""

from scaling.prepare import main

if __name__ == "__main__":
    main("fineweb_edu")
