# Reference: `requirements`.
from fal_serverless import isolated

requirements = ["pyjokes"]

@isolated(requirements=requirements)
def my_function():
  import pyjokes
  return pyjokes.get_joke()

# --- run it ---
print(my_function())
