-- Argo CD health check for kubetrain.dev TrainingRun; argocd-cm key
-- resource.customizations.health.kubetrain.dev_TrainingRun (charts/kubetrain/argocd/argocd-cm.yaml).
-- Like Argo CD's check for a Job: Progressing while pending or training, Healthy once it
-- succeeded, Degraded when it failed, Suspended while spec.suspend holds it. A status written
-- for an older generation is not trusted yet (kstatus: observedGeneration < generation).
local hs = {}

local function condition(conditionType)
  if obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == conditionType then
      return c
    end
  end
  return nil
end

local function isTrue(c)
  return c ~= nil and c.status == "True"
end

local function messageOf(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetrain operator to pick up the run"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local phase = obj.status.phase
local ready = condition("Ready")
local failed = condition("Failed")
local suspended = condition("Suspended")

if isTrue(failed) or phase == "Failed" then
  hs.status = "Degraded"
  hs.message = messageOf(failed, messageOf(ready, "Failed"))
  return hs
end
if isTrue(suspended) or phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = messageOf(suspended, "Suspended")
  return hs
end
if isTrue(ready) or phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = messageOf(ready, "Succeeded")
  return hs
end

-- Pending or Running: say what it waits for, or where training stands.
hs.status = "Progressing"
hs.message = phase .. ": " .. messageOf(ready, "")
local progress = obj.status.progress
if progress ~= nil and progress.step ~= nil and progress.totalSteps ~= nil then
  hs.message = hs.message .. " (step " .. progress.step .. "/" .. progress.totalSteps .. ")"
end
return hs
