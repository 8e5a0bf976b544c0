# Reference: local development: `.on(local)`, `.on(cloud, machine_type=...)`, `host=local`.
from fal_serverless import isolated

requirements = ["pyjokes"]

@isolated(requirements=requirements, machine_type="M")
def my_function():
  import pyjokes
  return pyjokes.get_joke()

from fal_serverless import isolated, local

my_function_local = my_function.on(local)

from fal_serverless import cloud

my_function_cloud = my_function_local.on(cloud, machine_type="M")

from fal_serverless import isolated, local

requirements = ["pyjokes"]

@isolated(requirements=requirements, host=local)
def my_function_local2():
  import pyjokes
  return pyjokes.get_joke()

# --- run it ---
print(my_function_local())
print(my_function_local2())
print(my_function_cloud())
