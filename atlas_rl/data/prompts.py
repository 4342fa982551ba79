"""A small offline set of general chat prompts (benchmarks and demos; no downloads)."""

from __future__ import annotations

GENERAL_PROMPTS: list[str] = [
    "Explain what a hash table is and when you would use one.",
    "Write a Python function that checks whether a string is a palindrome.",
    "List five tips for writing clear emails at work.",
    "What is the difference between weather and climate?",
    "Write a short poem about the sea at night.",
    'Return a JSON object with the fields "name", "age" and "city" for a fictional person.',
    "Explain recursion to a ten-year-old.",
    "Write a SQL query that returns the ten most recent orders from a table called orders.",
    "Summarise the plot of Romeo and Juliet in three sentences.",
    "What are the main causes of inflation?",
    "Write a JavaScript function that returns the sum of an array of numbers.",
    "Give three reasons why regular exercise is good for health.",
    "Describe how a bill becomes a law in a few steps.",
    "Write a C function that reverses a linked list.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a haiku about autumn leaves.",
    "How do vaccines train the immune system?",
    "Write a bash command that counts the lines of every .py file in a folder.",
    "What is photosynthesis? Answer in two sentences.",
    "Give a recipe for a simple tomato pasta sauce.",
    "Explain what an API is, with an example.",
    "Write a Rust function that returns the largest element of a slice of integers.",
    "What should I pack for a three-day hiking trip?",
    "Explain the rules of tic-tac-toe.",
]
