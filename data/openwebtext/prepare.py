"""Prepare openwebtext into data/openwebtext: python data/openwebtext/prepare.py [--input FILE] [--out DIR]"""

from scaling.prepare import main

if __name__ == "__main__":
    main("openwebtext")
