// One private endpoint for one sub-resource (group) of a service, registered in
// its private DNS zone so the service's public host name resolves privately.

@description('Private endpoint name.')
param name string

@description('Azure region.')
param location string

@description('Tags for the endpoint.')
param tags object = {}

@description('Subnet the endpoint gets its private IP from.')
param subnetId string

@description('Resource id of the service the endpoint connects to.')
param serviceId string

@description('Sub-resource (group id) of the service: blob, queue, table, Sql, redisCache, redisEnterprise, postgresqlServer.')
param groupId string

@description('Resource id of the private DNS zone for that group.')
param privateDnsZoneId string

resource endpoint 'Microsoft.Network/privateEndpoints@2024-05-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    subnet: {
      id: subnetId
    }
    privateLinkServiceConnections: [
      {
        name: name
        properties: {
          privateLinkServiceId: serviceId
          groupIds: [
            groupId
          ]
        }
      }
    ]
  }

  resource dns 'privateDnsZoneGroups' = {
    name: 'default'
    properties: {
      privateDnsZoneConfigs: [
        {
          name: groupId
          properties: {
            privateDnsZoneId: privateDnsZoneId
          }
        }
      ]
    }
  }
}

output id string = endpoint.id
