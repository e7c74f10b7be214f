// The user-assigned managed identity the Function App runs as. Every data-plane
// grant in this deployment (Storage, Cosmos DB, Redis, Postgres, App Insights
// ingestion) is given to this identity; no keys or passwords exist anywhere.

@description('Name of the user-assigned managed identity.')
param name string

@description('Azure region.')
param location string

@description('Tags for the identity.')
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output principalId string = identity.properties.principalId
output clientId string = identity.properties.clientId
