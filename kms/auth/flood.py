"""The login flood shedder: WSGI middleware in front of Flask.

During a login flood, a login from the flooding source that the hasher's admission would refuse
at once is refused here, before Flask parses it: answering such refusals through Flask would
spend the worker's GIL that key look-ups need; other sources' logins go on to the route. The answer is the one the route would give (429, the envelope, Retry-After).
The server then does not read the connection again until the Retry-After has passed (as after
every 429, kms.serving.http): a flood that re-sends at once is answered once a second per
connection.
"""
from kms.auth.passwords import FLOOD_MESSAGE, FLOOD_RETRY_AFTER_S, PasswordHasher
from kms.web import ANSWERED_ENDPOINT, REQUEST_ID, SHED, caller_address
from kms.web.envelope import envelope_json


class LoginFloodShedder:
    def __init__(self, wsgi_app, passwords: PasswordHasher, login_rule, trusted_proxy_hops: int = 0):
        """`login_rule`: the login route's rule in the app's URL map (its path and endpoint)."""
        self.wsgi_app = wsgi_app
        self.passwords = passwords
        self.login_path, self.login_endpoint = login_rule.rule, login_rule.endpoint
        self.hops = trusted_proxy_hops

    def _source(self, environ) -> str:
        """The caller's address as the application will see it (werkzeug's ProxyFix, inside)."""
        return caller_address(environ.get("REMOTE_ADDR", ""), environ.get("HTTP_X_FORWARDED_FOR"), self.hops)

    def __call__(self, environ, start_response):
        if (environ["PATH_INFO"] == self.login_path and environ["REQUEST_METHOD"] == "POST"
                and self.passwords.refuse_if_flooded(self._source(environ))):
            environ[ANSWERED_ENDPOINT] = self.login_endpoint
            environ[SHED] = "login"
            body = envelope_json("too_many_requests", FLOOD_MESSAGE, environ.get(REQUEST_ID))
            start_response("429 TOO MANY REQUESTS", [("Content-Type", "application/json"),
                                                     ("Content-Length", str(len(body))),
                                                     ("Retry-After", str(FLOOD_RETRY_AFTER_S))])
            return [body]
        return self.wsgi_app(environ, start_response)
