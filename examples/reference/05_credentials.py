# Reference: `credentials`.
from fal_serverless import isolated, CloudKeyCredentials

credentials = CloudKeyCredentials(key_id='your-key-id', key_secret='your-key-secret')

@isolated(credentials=credentials)
def my_function():
    return "hello world"

# --- run it ---
from fal_serverless import AuthenticationError

try:
    print(my_function())
except AuthenticationError as error:  # on a server, the reference's placeholder key is refused, as it should be
    print(f"refused: {error}")
