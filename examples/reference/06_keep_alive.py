# Reference: `keep_alive`.
from fal_serverless import isolated


@isolated(keep_alive=20, requirements=["pyjokes"])
def get_joke():
    import pyjokes
    return pyjokes.get_joke()

# --- run it ---
if __name__ == "__main__":
    print(get_joke())
    print(get_joke())  # within 20 s: the same warm worker
