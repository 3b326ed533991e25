--[[ celery_saga transitions, part 2 of 3 (after transitions.lua, before
dispatch.lua; store/redis.py TRANSITION_FILES): semantic locks. ]]

