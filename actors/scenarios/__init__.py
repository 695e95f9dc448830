"""The scenario set written for this project, in the Sotopia layout (read by ``actors.sotopia``).

Data only: this file exists so that setuptools packages the folder and its JSON files with ``actors``.
"""
