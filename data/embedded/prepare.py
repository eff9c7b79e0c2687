"""Prepare embedded into data/embedded: python data/embedded/prepare.py [--input FILE] [--out DIR]"""

from scaling.prepare import main

if __name__ == "__main__":
    main("embedded")
