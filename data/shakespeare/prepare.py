"""Prepare shakespeare into data/shakespeare: python data/shakespeare/prepare.py [--input FILE] [--out DIR]"""

from scaling.prepare import main

if __name__ == "__main__":
    main("shakespeare")
