"""The contract and the basics every stage shares: the stage declaration, recipe sections, figures as text, shipped files."""
