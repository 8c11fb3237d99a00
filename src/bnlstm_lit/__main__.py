"""``python -m bnlstm_lit fit --config configs/adding_bnlstm.yaml``"""

from bnlstm_lit.cli import main

if __name__ == "__main__":
    main()
