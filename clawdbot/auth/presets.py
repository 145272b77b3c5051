"""
The single sign-on presets as data: the endpoints of WeCom, DingTalk and
Feishu (each overridable by C{oauth2.endpoints}) and the scopes each asks
for.  A leaf: the config checks endpoint names against it without knowing
the providers (L{clawdbot.auth.providers}).
"""

PRESET_ENDPOINTS: dict[str, dict[str, str]] = {
    # WeCom, self-built app:
    #   Web login link   https://developer.work.weixin.qq.com/document/path/98171
    #   gettoken         https://developer.work.weixin.qq.com/document/path/91039
    #   auth/getuserinfo https://developer.work.weixin.qq.com/document/path/98177
    #                    (in-client OAuth: .../path/96442)
    #   user/get         https://developer.work.weixin.qq.com/document/path/90196
    #   getuserdetail    https://developer.work.weixin.qq.com/document/path/96443
    "wecom": {
        "authorize": "https://login.work.weixin.qq.com/wwlogin/sso/login",
        "api": "https://qyapi.weixin.qq.com",
    },
    # DingTalk, internal app:
    #   login            https://open.dingtalk.com/document/isvapp/tutorial-enabling-login-to-third-party-websites
    #   userAccessToken  https://open.dingtalk.com/document/orgapp/obtain-user-token
    #   users/me         https://open.dingtalk.com/document/orgapp/dingtalk-retrieve-user-information
    #   getbyunionid     https://open.dingtalk.com/document/isvapp/query-a-user-by-the-union-id
    #   v2/user/get      https://open.dingtalk.com/document/orgapp/query-user-details
    "dingtalk": {
        "authorize": "https://login.dingtalk.com/oauth2/auth",
        "token": "https://api.dingtalk.com/v1.0/oauth2/userAccessToken",
        "userinfo": "https://api.dingtalk.com/v1.0/contact/users/me",
        "oapi": "https://oapi.dingtalk.com",
    },
    # Feishu:
    #   authorize        https://open.feishu.cn/document/common-capabilities/sso/api/obtain-oauth-code
    #   token (v2)       https://open.feishu.cn/document/uAjLw4CM/ukTMukTMukTM/authentication-management/access-token/get-user-access-token
    #   user_info        https://open.feishu.cn/document/uAjLw4CM/ukTMukTMukTM/reference/authen-v1/user_info/get
    #   contact user     https://open.feishu.cn/document/uAjLw4CM/ukTMukTMukTM/reference/contact-v3/user/get
    "feishu": {
        "authorize": "https://accounts.feishu.cn/open-apis/authen/v1/authorize",
        "token": "https://open.feishu.cn/open-apis/authen/v2/oauth/token",
        "userinfo": "https://open.feishu.cn/open-apis/authen/v1/user_info",
        "contact": "https://open.feishu.cn/open-apis/contact/v3/users",
    },
}

# What a preset asks for when C{oauth2.scopes} is left at its OIDC default.
OIDC_DEFAULT_SCOPES: tuple[str, ...] = ("openid", "profile", "email")
PRESET_SCOPES: dict[str, tuple[str, ...]] = {"wecom": ("snsapi_base",), "dingtalk": ("openid", "corpid"), "feishu": ()}
