# Reference: `credentials`.
from fal_serverless import CloudKeyCredentials, isolated

credentials = CloudKeyCredentials(key_id='your-key-id', key_secret='your-key-secret')

@isolated(credentials=credentials)
def my_function():
    return "hello world"

# --- run it ---
print(my_function())
