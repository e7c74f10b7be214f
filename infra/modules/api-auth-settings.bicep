// App Service built-in authentication (authsettingsV2) in front of the Function
// App: requests without a valid token for the API's registration are answered
// 401 before they reach the worker; /api/health stays open for the availability
// test. The app validates every token itself too and enforces the app roles
// (support_cases/auth.py): Microsoft's Flex Consumption documentation has listed
// built-in authentication as not (yet) supported there, so the app's own check is
// the one relied on (README, "Who may do what").

@description('Name of the existing Function App.')
param functionAppName string

@description('Client id of the API app registration (the accepted token audience).')
param clientId string

@description('Client ids of the applications whose tokens are accepted (the app\'s AUTH_ALLOWED_CLIENT_IDS).')
param allowedClientIds array

resource functionApp 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

resource authSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: functionApp
  name: 'authsettingsV2'
  properties: {
    platform: {
      enabled: true
    }
    globalValidation: {
      requireAuthentication: true
      unauthenticatedClientAction: 'Return401'
      excludedPaths: [
        '/api/health'
      ]
    }
    httpSettings: {
      requireHttps: true
    }
    identityProviders: {
      azureActiveDirectory: {
        enabled: true
        registration: {
          clientId: clientId
          openIdIssuer: '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
        }
        validation: {
          allowedAudiences: [
            clientId
          ]
          // A token issued to any other client (one a user consented to) is refused.
          defaultAuthorizationPolicy: {
            allowedApplications: allowedClientIds
          }
        }
      }
    }
    login: {
      tokenStore: {
        enabled: false
      }
    }
  }
}
