# Reference: `isolated` decorator.
from fal_serverless import isolated


@isolated()
def my_function():
  return "Hello World"

# --- run it ---
print(my_function())
