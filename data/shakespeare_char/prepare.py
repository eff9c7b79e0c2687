"""Prepare shakespeare_char into data/shakespeare_char: python data/shakespeare_char/prepare.py [--input FILE] [--out DIR]"""

from scaling.prepare import main

if __name__ == "__main__":
    main("shakespeare_char")
