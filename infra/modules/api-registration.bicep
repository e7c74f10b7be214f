// The API's Microsoft Entra app registration (Microsoft Graph Bicep extension):
// callers get access tokens for it, and its app roles say what each may do.
// Declarative and keyed by `uniqueName`, so every `azd provision` converges on
// the same registration instead of creating another one.
//
// The deploying user needs permission to register applications (by default any
// member may; otherwise Application Developer) and, to assign the roles below to
// AZURE_PRINCIPAL_ID, to own the service principal or be a Cloud Application
// Administrator.
extension microsoftGraphV1

@description('Unique name (alternate key) of the app registration in the tenant.')
param uniqueName string

@description('Display name of the app registration.')
param displayName string

@description('Object id of the deploying user (AZURE_PRINCIPAL_ID): gets every app role, to call the API. Empty: no assignment.')
param developerPrincipalId string = ''

// What each role allows (enforced by the app, support_cases/auth.py). Role ids are
// stable per registration, so re-provisioning never orphans an assignment.
var appRoles = [
  {
    value: 'Cases.Submit'
    displayName: 'Submit cases'
    description: 'Submit support cases and follow-ups; read the cases this caller submitted.'
  }
  {
    value: 'Cases.Review'
    displayName: 'Review refunds'
    description: 'Approve or reject escalated refunds; read cases awaiting review.'
  }
  {
    value: 'Cases.Operate'
    displayName: 'Operate'
    description: 'Resume runs; read every case, its checkpoints and audit trail; detailed health.'
  }
]

resource api 'Microsoft.Graph/applications@v1.0' = {
  uniqueName: uniqueName
  displayName: displayName
  signInAudience: 'AzureADMyOrg'
  api: {
    // v2 access tokens: `aud` is the client id, `iss` is the tenant's v2.0 issuer.
    requestedAccessTokenVersion: 2
    // A delegated scope, so a user can consent to a client (e.g. the Azure CLI) asking
    // for a token on their behalf; what the user may do is still their app roles.
    oauth2PermissionScopes: [
      {
        id: guid(uniqueName, 'user_impersonation')
        value: 'user_impersonation'
        type: 'User'
        isEnabled: true
        adminConsentDisplayName: 'Call the agent-state API'
        adminConsentDescription: 'Lets the client call the agent-state API as the signed-in user.'
        userConsentDisplayName: 'Call the agent-state API'
        userConsentDescription: 'Lets the client call the agent-state API as you.'
      }
    ]
  }
  appRoles: [
    for role in appRoles: {
      id: guid(uniqueName, role.value)
      value: role.value
      displayName: role.displayName
      description: role.description
      allowedMemberTypes: [
        'User'
        'Application'
      ]
      isEnabled: true
    }
  ]
}

resource apiPrincipal 'Microsoft.Graph/servicePrincipals@v1.0' = {
  appId: api.appId
  // Only users and client applications assigned a role get a token for the API at all.
  appRoleAssignmentRequired: true
}

resource developerRoles 'Microsoft.Graph/appRoleAssignedTo@v1.0' = [
  for role in appRoles: if (!empty(developerPrincipalId)) {
    appRoleId: guid(uniqueName, role.value)
    principalId: developerPrincipalId
    resourceId: apiPrincipal.id
  }
]

output clientId string = api.appId
output servicePrincipalId string = apiPrincipal.id
