"""``llmsample explore``: step through a generation a token at a time, take another token, change a setting, branch.

- ``stepper``: the model side, no UI: the branches, their steps, the KV cache kept in step with the path shown;
- ``session_file``: the saved session (JSON, ``type: explore_session``, schema 1);
- ``app``: the full-screen terminal program (Textual), drawn on stderr so that stdout carries only the answer;
- ``start``: the command: checks the terminal, loads the model, runs the program, prints the chosen text.
"""
